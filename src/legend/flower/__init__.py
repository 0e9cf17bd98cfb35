"""Deployment on Flower (optional extra ``legend[flower]``): the engine's round loop with Flower nodes as devices."""
