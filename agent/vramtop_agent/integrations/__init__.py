"""Integrations with training frameworks (imported on demand; nothing here imports a framework eagerly).

- vramtop_agent.integrations.hf.VramtopCallback: Hugging Face Trainer (and TRL's SFTTrainer,
  anything built on Trainer).
- vramtop_agent.integrations.lightning.VramtopCallback: PyTorch Lightning.

Both start the agent with the model and optimizer, put the framework's
training settings in the hello message (`training`) and add the memory
blocks and phase peaks to the framework's own logs. See docs/integrations.md.
"""
