"""Layer replacement (hybrid models from a base and a donor, GA search over layer lists).

Reserved by the design for the layer-replacement issue; nothing here yet.
"""
