"""The paper's training configs, shipped as package data (``reste_timm.configs``): one YAML per table row."""
