"""The cluster as a whole: the `switch-serve` command line, the Serve application builder and local serving,
checkpoint conversion and Hub downloads, the benchmark, the demo and the soak run. The top layer: imports
`router_service` and `experts`."""
