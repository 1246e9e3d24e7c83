"""Recovery fine-tuning of compressed models (LoRA through peft, merged back into a plain checkpoint).

Reserved by the layout for the recovery issue; nothing here yet. Like its siblings it will take plain
arguments and import only ``core``.
"""
