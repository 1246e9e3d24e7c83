"""Recovery fine-tuning of compressed models: LoRA through peft, merged back into the model's own checkpoint format.

    lora.py   LoRASpec (conf/recovery/*.yaml's fields), the target modules of any decoder layout, attach, merge
    data.py   the training text: sources, the 90/10 split into training and held-out text, rows, instruction chats
    train.py  the training loop: AdamW on the adapters, held-out perplexity, early stopping, resumable state

Like its siblings it takes plain arguments (a model, a tokenizer, a spec) and imports only ``core``;
``recipes/_recovery.py`` (task=finetune's and task=prune's ``recovery=lora`` stage) combines it with evaluation.
"""
