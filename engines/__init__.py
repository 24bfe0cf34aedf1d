"""Engine builds from ONNX: TensorRT plans per GPU, ONNX Runtime engines for CPU machines."""
