"""The gRPC streaming inspection service and its camera-simulating client."""
