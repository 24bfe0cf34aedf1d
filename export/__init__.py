"""Export of diffusers networks to validated ONNX, one spec object per network kind."""
