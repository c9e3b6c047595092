"""The pixel path: decoding, the ONNX runtime, the classify and detect worker, activation maps and model cards."""
