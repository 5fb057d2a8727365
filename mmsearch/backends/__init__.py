"""The two ways mmsearch runs a model: ``onnx_backend`` (ONNX Runtime over an exported folder, no
torch: queries and indexing) and ``torch_backend`` (open_clip: training, export, and the fallback
``--backend torch``). Both give the same vectors to float tolerance; ``mmsearch.encoder`` picks one."""
