"""The folders fluxexport writes and reads, as typed records: an export folder (ONNX graphs), an engine folder
(TensorRT plans) and the settings of a Triton repository. Every module reads them through `open_export`,
`open_engines` or `open_folder` (`folders.py`), never by indexing `manifest.json` itself.
"""
