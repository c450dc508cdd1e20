"""switch-serve: Switch Transformers with expert parallelism on Ray."""

import os

# A front waits on the expert actors after each sparse layer. Its OpenMP threads would spin for a while after
# every op, on the cores the actors need meanwhile; a short spin keeps its speed and frees them. OpenMP reads
# this when torch loads: set here for fronts in this process (the Python API, the CLI), and in the Serve
# replicas' runtime_env (cluster.app).
FRONT_ENV = {"GOMP_SPINCOUNT": "10000"}
for _name, _value in FRONT_ENV.items():
    os.environ.setdefault(_name, _value)
