"""Memory planning: what a run needs per replica and per host, before it
starts (network.py counts, devices.py capacities, memory.py the plan)."""
