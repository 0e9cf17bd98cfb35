"""Heterogeneous devices: profiles and fleets (`fleet`, `profiles`), the cost model (`cost`: FLOPs, memory, bytes)
and the virtual clock (`clock`). Nothing is imported here: a fleet is built without loading torch."""
