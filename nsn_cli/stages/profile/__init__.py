"""`nsn profile`: measure metric, FLOPs, parameters, latency and memory at each budget."""
