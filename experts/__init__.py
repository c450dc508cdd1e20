"""The experts: where each expert FFN lives and what runs there. The Switch architecture and checkpoint reading
they are loaded from, the expert actor, and the placement, planner and fleet that start actors across GPUs and
nodes. Imports no other package of the project."""
