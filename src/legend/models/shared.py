"""The one base model that every simulated client shares; a client's state is swapped in as tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from legend.core import ModelInfo, State
from legend.data.batching import model_inputs
from legend.errors import LegendError
from legend.lora.bottleneck import inject_bottlenecks
from legend.lora.init import apply_federa
from legend.lora.layout import AdapterLayout, base_weight_key, inject_lora
from legend.models.placement import quantization_config
from legend.models.resolve import resolve_model


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList whose children all share one type (index 0 nearest the input)."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(child) for child in module}) == 1
    ]
    if not candidates:
        raise LegendError(f"cannot find the transformer blocks of {type(model).__name__}: no list of identical layers")
    return max(candidates, key=lambda item: len(item[1]))


def default_target_modules(model_type: str) -> tuple[str, ...]:
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise LegendError(f'no default LoRA targets for model type \'{model_type}\': set lora.target_modules, e.g. ["q_proj", "v_proj"]')
    return tuple(targets)


class _PrefixDone(Exception):
    """Stops a forward pass once the prefix output is captured."""


class SharedModel:
    """A sequence classifier or causal LM with the global adapter layout injected once.

    ``load`` swaps a client's (or the global) tensors in; ``read`` takes them out; nothing is copied
    per client but those tensors.
    """

    def __init__(
        self,
        module: nn.Module,
        tokenizer,
        info: ModelInfo,
        compute_dtype: torch.dtype = torch.float32,
        blocks_only: bool = False,
        quantize: str = "none",
    ):
        """``blocks_only``: nothing outside the blocks ever trains (a causal LM's embeddings, final norm and LM head,
        whatever the layout says: full fine-tuning then trains the blocks)."""
        self.module = module
        self.blocks_only = blocks_only
        self.tokenizer = tokenizer
        self.info = info
        self.blocks_prefix = info.blocks_prefix
        self.compute_dtype = compute_dtype  # of matrix multiplies in forward and backward passes (engine.precision)
        self.device = torch.device("cpu")  # where the module and every batch live (engine.device); states stay on the CPU
        self.quantize = quantize  # model.quantize: the block weights' storage ('none': float32)
        module.requires_grad_(False)
        self._index_parameters()

    def autocast(self) -> torch.autocast:
        """Inside: matrix multiplies run in ``compute_dtype`` (parameters, gradients and the loss stay float32)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def to(self, device: torch.device) -> SharedModel:
        """Move the module (base weights and adapters) to ``device``; ``read`` still hands out CPU copies, ``load`` takes any.
        A quantized model was loaded onto its GPU and stays (bitsandbytes' weights cannot move)."""
        if self.quantize == "none":
            self.module.to(device)
        self.device = device
        self._index_parameters()
        return self

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on the model's device (the one host-to-device copy of a step)."""
        if self.device.type == "cpu":
            return batch
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _index_parameters(self) -> None:
        self.params = dict(self.module.named_parameters())
        self._block = {key: self.info.block_of(key) for key in self.params}
        base = self.module.base_model_prefix + "."
        self._is_head = {key: not key.startswith(base) for key in self.params}
        first_block = next(i for i, key in enumerate(self.params) if self._block[key] is not None)
        # parameters are registered input first: what comes before the first block (the embeddings) feeds it
        self._below_blocks = {key for i, key in enumerate(self.params) if i < first_block}

    @classmethod
    def build(
        cls,
        name: str,
        num_labels: int,
        target_modules: tuple[str, ...] = (),
        seed: int = 0,
        dropout: float | None = None,
        compute_dtype: torch.dtype = torch.float32,
        causal_lm: bool = False,
        quantize: str = "none",
        device: torch.device | None = None,
    ) -> SharedModel:
        """A sequence classifier with a new head of ``num_labels`` classes (drawn from the seed), or with ``causal_lm`` the
        model with its own LM head. ``quantize`` ('4bit', '8bit'): loaded straight onto ``device`` (a GPU) in bitsandbytes' form."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        source = resolve_model(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source, **({} if causal_lm else {"num_labels": num_labels}))
            if dropout is not None:  # every "*dropout*" rate of the architecture, whatever its name
                for key, value in config.to_dict().items():
                    if "dropout" in key and isinstance(value, float):
                        setattr(config, key, dropout)
            torch.manual_seed(seed)  # the new classification head is drawn from the seed
            auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
            quantization = quantization_config(quantize, device or torch.device("cpu"), compute_dtype)
            placed = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
            module = auto.from_pretrained(source, config=config, dtype=torch.float32, **placed)
        except OSError as exc:
            raise LegendError(
                f"model.name '{name}' could not be loaded ({str(exc).splitlines()[0]}): use minilm-l6, smollm2-135m or a local directory"
            ) from None
        except ValueError as exc:  # transformers: no causal-LM (or classifier) class for this architecture
            fix = (
                "use a decoder (Llama, Qwen, Mistral family) for data.format=instruct"
                if causal_lm
                else "use data.format=instruct for a decoder without a classifier"
            )
            raise LegendError(
                f"model.name '{name}' cannot be loaded as {auto.__name__} ({str(exc).splitlines()[0][:160]}): {fix}"
            ) from None
        if tokenizer.pad_token_id is None:  # decoder models: pad with EOS, and tell the head where padding starts
            tokenizer.pad_token = tokenizer.eos_token
        module.config.pad_token_id = tokenizer.pad_token_id
        prefix, blocks = find_blocks(module)
        targets = tuple(target_modules) or default_target_modules(module.config.model_type)
        info = ModelInfo(module.config.model_type, len(blocks), module.config.hidden_size, targets, prefix)
        return cls(module, tokenizer, info, compute_dtype, blocks_only=causal_lm, quantize=quantize)

    def add_adapters(
        self, layout: AdapterLayout, lora_alpha: float | Sequence[float], lora_dropout: float, seed: int = 0, lora_init: str = "default"
    ) -> None:
        """Inject the strategy's global layout once (initial adapters drawn from the seed, or FeDeRA's SVD of
        the weights: the same on every client and the server)."""
        blocks = self._blocks()
        torch.manual_seed(seed)
        if layout.method == "adapter":
            inject_bottlenecks(blocks, self.info.hidden_size, layout)
        elif layout.method == "lora":
            self._inject_lora(blocks, layout, lora_alpha, lora_dropout)
            if lora_init == "federa":
                apply_federa(self.module)
        self.module.requires_grad_(False)
        self._index_parameters()

    def _inject_lora(self, blocks: nn.ModuleList, layout: AdapterLayout, lora_alpha: float | Sequence[float], lora_dropout: float) -> None:
        names = {
            i: [
                f"{self.blocks_prefix}.{i}.{sub}"
                for sub, m in block.named_modules()
                if isinstance(m, nn.Linear) and sub.split(".")[-1] in self.info.target_modules
            ]
            for i, block in enumerate(blocks)
        }
        if not any(names.values()):
            raise LegendError(f"lora.target_modules {list(self.info.target_modules)} match no linear layer in the model's blocks")
        inject_lora(self.module, names, layout, lora_alpha, lora_dropout)

    def block_of(self, key: str) -> int | None:
        return self._block[key]

    def is_head(self, key: str) -> bool:
        return self._is_head[key]

    def keys(self, layout: AdapterLayout) -> list[str]:
        """Tensors this layout trains, in a fixed order."""
        return [
            k
            for k in self.params
            if layout.trains(k, self._block[k], self._is_head[k]) and not (self.blocks_only and self._block[k] is None)
        ]

    def device_shapes(self, layout: AdapterLayout) -> dict[str, tuple[int, ...]]:
        """Shape on the device of every tensor this layout trains (LoRA factors cut to its ranks)."""
        return {key: tuple(layout.device_shape(key, self._block[key], self.params[key].shape)) for key in self.keys(layout)}

    def read(self, layout: AdapterLayout, params: dict[str, torch.Tensor] | None = None) -> State:
        """Copies of the tensors this layout trains, cut to the layout's shapes (from ``params``: one client's own copies
        of them when several train at once, ``engine/parallel.py``; default the model's)."""
        params = params or self.params
        return {key: cpu_copy(params[key].detach()[tuple(slice(0, n) for n in shape)]) for key, shape in self.device_shapes(layout).items()}

    def base_weights(self, modules) -> State:
        """Copies of the frozen weights W of these LoRA-adapted modules (strategies that merge into W make them global state)."""
        return {key: cpu_copy(self.params[key].detach()) for key in map(base_weight_key, modules)}

    @torch.no_grad()
    def load(self, state: State) -> None:
        """Copy tensors in; a LoRA factor cut to a smaller rank fills the leading rows/columns, the rest is zero."""
        for key, value in state.items():
            param = self.params.get(key)
            if param is None:
                raise KeyError(f"tensor '{key}' is not part of the model")
            fill_leading(param, value)

    def frozen_prefix(self, changing: Sequence[str]) -> int:
        """How many blocks lie below every tensor in ``changing`` (0 when one of them is an embedding): the
        embeddings and those blocks compute the same function of an example for as long as only these tensors change."""
        if any(key in self._below_blocks for key in changing):
            return 0
        return min((self._block[key] for key in changing if self._block[key] is not None), default=self.info.num_blocks)

    def prefix_parameters(self, boundary: int) -> list[nn.Parameter]:
        """The embeddings and the blocks below ``boundary``."""
        return [
            p
            for key, p in self.params.items()
            if key in self._below_blocks or (self._block[key] is not None and self._block[key] < boundary)
        ]

    @torch.no_grad()
    def prefix_output(self, batch: dict[str, torch.Tensor], boundary: int) -> torch.Tensor:
        """(B, T, H): the hidden states entering block ``boundary`` (the blocks from there on are not run)."""
        captured = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _PrefixDone

        handle = self._blocks()[boundary].register_forward_pre_hook(grab, with_kwargs=True)
        training = self.module.training
        self.module.eval()
        try:
            with self.autocast():
                self.module(**model_inputs(self.on_device(batch)))
        except _PrefixDone:
            pass
        finally:
            handle.remove()
            self.module.train(training)
        return captured[0]

    @contextlib.contextmanager
    def starting_at(self, boundary: int, hidden: torch.Tensor) -> Iterator[None]:
        """Inside: a forward pass runs only the blocks from ``boundary`` on, with ``hidden`` (B, T, H) as their input
        (the embeddings still run, cheaply, and their output is dropped; the blocks below are skipped)."""
        parent_name, _, attribute = self.blocks_prefix.rpartition(".")
        parent, blocks = self.module.get_submodule(parent_name), self._blocks()

        hidden = hidden.to(self.device)

        def feed(module, args, kwargs):
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = blocks[boundary].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(parent, attribute, nn.ModuleList(list(blocks)[boundary:]))
        try:
            yield
        finally:
            setattr(parent, attribute, blocks)
            handle.remove()

    @contextlib.contextmanager
    def skipping(self, skipped: Sequence[int]) -> Iterator[None]:
        """Inside: a forward pass leaves out the blocks in ``skipped`` (FedRA's shallower local model), so the next block
        reads what the one before them wrote and nothing is computed in them, forward or backward (a block-list swap)."""
        if not skipped:
            yield
            return
        parent_name, _, attribute = self.blocks_prefix.rpartition(".")
        parent, blocks = self.module.get_submodule(parent_name), self._blocks()
        left_out = set(skipped)
        setattr(parent, attribute, nn.ModuleList([block for i, block in enumerate(blocks) if i not in left_out]))
        try:
            yield
        finally:
            setattr(parent, attribute, blocks)

    def _blocks(self) -> nn.ModuleList:
        return self.module.get_submodule(self.blocks_prefix)

    def freeze(self) -> None:
        for param in self.params.values():
            param.requires_grad_(False)

    def set_trainable(self, layout: AdapterLayout) -> dict[str, nn.Parameter]:
        keys = set(self.keys(layout))
        for key, param in self.params.items():
            param.requires_grad_(key in keys)
        return {k: param for k, param in self.params.items() if k in keys}


def fill_leading(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``target`` in place; a LoRA factor cut to a smaller rank fills the leading rows/columns, zeros the rest."""
    if target.shape == value.shape:
        target.copy_(value)
    else:
        target.zero_()
        target[tuple(slice(0, n) for n in value.shape)].copy_(value)


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, whatever device the tensor is on (states travel, and are aggregated, on the CPU)."""
    return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")
