"""Property-based: whatever config or update is thrown at them, the config loader and the update
validator answer with a clean result or one clean error line, never a traceback."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legend.config import Config, load_config, validate_config
from legend.core import Update
from legend.engine.validation import rejection
from legend.errors import LegendError

SECTIONS = {
    name: list(field.annotation.model_fields) for name, field in Config.model_fields.items() if hasattr(field.annotation, "model_fields")
}
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["minilm-l6", "legend", "fedit", "sst2", "dirichlet", "float16", "jetson-mix-80", ""]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6
)
KEY = st.one_of(st.sampled_from([k for keys in SECTIONS.values() for k in keys]), st.text(max_size=10))
SECTION = st.dictionaries(KEY, VALUES, max_size=4)
RAW = st.dictionaries(st.one_of(st.sampled_from([*SECTIONS, "seed"]), st.text(max_size=8)), st.one_of(SECTION, VALUES), max_size=5)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepted_or_one_line(load):
    try:
        assert isinstance(load(), Config)
    except LegendError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message


@FAST
@given(RAW)
def test_random_configs_load_or_fail_with_one_line(raw):
    accepted_or_one_line(lambda: validate_config(raw))


@FAST
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]), st.text(max_size=12)),
            st.one_of(st.text(max_size=12), st.sampled_from(["5", "0.1", "true", "[1, 2]", '"x"', "{a = 1}", "-3", "nan", "inf"])),
        ),
        max_size=4,
    )
)
def test_random_overrides_load_or_fail_with_one_line(pairs):
    accepted_or_one_line(lambda: load_config(None, [f"{key}={value}" for key, value in pairs]))


EXPECTED = {"lora_A": ((2, 3), torch.float32), "head": ((2,), torch.float32)}
START = {"lora_A": torch.zeros(2, 3), "head": torch.zeros(2)}
NUMBERS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]))
    values = draw(st.lists(NUMBERS, min_size=math.prod(shape), max_size=math.prod(shape)))
    tensor = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return tensor.to(dtype) if dtype != torch.bool else tensor > 0


@FAST
@given(st.dictionaries(st.sampled_from(["lora_A", "head", "lora_B", ""]), tensors(), max_size=3), st.floats(0, 1e6))
def test_random_corrupted_updates_are_judged_never_raised(weights, max_norm):
    verdict = rejection(Update(0, weights, 10), EXPECTED, START, max_norm)
    assert verdict is None or (isinstance(verdict, str) and "\n" not in verdict)
    if verdict is None:
        assert all(torch.isfinite(weights[k]).all() and weights[k].shape == shape for k, (shape, _) in EXPECTED.items())
