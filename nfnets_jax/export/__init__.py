"""Export for serving: the folded network as StableHLO, TF SavedModel, TFLite or ONNX.

`serving.py` wraps a folded network (optionally with the evaluation
preprocessing) as one function; `writers.py` writes it in each format
(`onnx_graph.py` translates its jaxpr to ONNX); `command.py` is
`python -m nfnets_jax.export` (docs/export.md).
"""

from nfnets_jax.export.writers import (FORMATS, INSTALL_HINT, REDUCED_PRECISION_FORMATS,
                                       STABLEHLO_PLATFORMS, check_dependencies,
                                       check_export_format, export, savedmodel_to_tflite,
                                       stablehlo_bytes, tflite_bytes, write_onnx,
                                       write_savedmodel)

