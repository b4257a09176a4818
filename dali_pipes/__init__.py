"""DALI pipelines: decode (nvJPEG) and augment CXR shards on the GPU, with the same graph runnable on the CPU."""
