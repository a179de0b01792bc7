"""Serving: chat generation for local models with torch (:mod:`.torch_engine`) and with ONNX Runtime GenAI
(:mod:`.onnx_engine`). Neither imports the local store, the worker or the server."""
