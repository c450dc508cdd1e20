"""The front: Switch's non-expert math, dispatch to the expert actors, continuous batching, the engine that ties
them together (the Python API) and the Serve deployment with its gRPC and HTTP faces. Imports `experts`,
never `cluster`."""
