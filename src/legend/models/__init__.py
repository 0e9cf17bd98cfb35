"""Model resolution (`resolve`: packaged, local folder, hub id), block discovery and the shared base model
(`shared`). Nothing is imported here: resolving a name or a cache folder does not load torch and peft."""
