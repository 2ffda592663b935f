"""W8A8: int8 weights AND activations, so TensorRT can run int8 GEMMs (DESIGN.md section 5).

TensorRT folds an int8 weight DQ with float activations back to float; int8 tensor cores need
Q/DQ on activations too. The calibration is ONNX Runtime's maintained static QDQ quantizer
(symmetric per-tensor activations, symmetric per-channel weights, explicit axis), run on
training rows saved with the checkpoint. Its input is an fp32 export of the dequantized backbone.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class FeedReader(CalibrationDataReader):
    """Feeds a fixed list of input dicts to the calibrator once."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize_w8a8(fp32_model: Path, out_path: Path, feeds: list[dict[str, np.ndarray]],
                  method: str = "minmax") -> Path:
    """Calibrate activations on `feeds` and write a QDQ model with int8 weights and activations."""
    if not feeds:
        raise ValueError("w8a8 calibration needs at least one batch of inputs")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True, save_as_external_data=True)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(
            str(pre), str(quantized), FeedReader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QDQKeepRemovableActivations": False},
        )
        model = onnx.load(str(quantized))  # external data as `<name>.onnx.data`, like every graph here
    onnx.save(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data", size_threshold=1024)
    return out_path
