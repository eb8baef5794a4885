"""The engine: pure plans (sections, sigmas), sampler, stitching, encoders and the section loop."""
