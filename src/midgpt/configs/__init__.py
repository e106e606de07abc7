"""Named run configs: each module defines one `config`, loaded by name with midgpt.config.load_config."""
