"""TensorRT engines: profiles and precision from the specs, builds, and the runtime backend.

Only builder.py and backend.py import tensorrt; everything else here is pure and tested on any machine.
"""
