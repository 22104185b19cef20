"""The MoE decoder: config, routing, expert backends, layers and the stack."""
