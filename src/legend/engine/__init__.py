"""Client-side training, the embedded simulation loop, and checkpoints."""
