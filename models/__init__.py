"""Model sources and the facts every layer shares: presets, the bundled reference model, the
closed-form sim, tensor names and dtypes, and where artifacts live."""
