"""DRiffusion runtime: the draft-and-refine sampler, device pools, pipelines and the CLI."""
