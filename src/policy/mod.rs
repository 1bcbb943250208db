//! Policy heads: sensor encoder, fusion, diffusion action expert, and the whole VLA policy.
