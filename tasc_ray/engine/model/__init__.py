"""The target model's forward over a batch of cache slots: the lean Llama-family forward, its CPU kernels, and
the packed linear layers other models run on."""
