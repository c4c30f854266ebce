"""`resources.extract_batch_size: auto`: images per encoder batch for one (encoder, resolution)."""

from __future__ import annotations

# resources.extract_batch_size auto (docs/gpu.md): CPU actors keep the batch that was always used;
# GPU actors take the largest power of two up to 256 (past it the H200 gained <5%) whose bf16
# activations fit: tokens x width x 2 bytes x ACTIVATION_FACTOR per image, a bound on the tensors
# live in a ViT block (qkv, the 4x MLP hidden, residuals) with room for compiled workspaces.
AUTO_CPU_BATCH = 32
AUTO_MAX_BATCH = 256
ACTIVATION_FACTOR = 24


def auto_batch(encoder: str, resolution: int, gpu: bool, memory_gb: float) -> int:
    """The largest power of two <= AUTO_MAX_BATCH whose activations fit `memory_gb` beside the
    bf16 weights on a GPU actor; AUTO_CPU_BATCH on CPU."""
    if not gpu:
        return AUTO_CPU_BATCH
    from tasks.encoders import get_encoder_spec

    spec = get_encoder_spec(encoder)
    if spec.arch == "vit":
        tokens, width = (resolution // spec.patch_size) ** 2 + spec.prefix_tokens, spec.embed_dim
    else:  # a convnet's largest activations: stride 4, an eighth of its final width
        tokens, width = (resolution // 4) ** 2, max(1, spec.embed_dim // 8)
    per_image = tokens * width * 2 * ACTIVATION_FACTOR
    free = memory_gb * 1e9 - spec.params * 2  # bf16 weights
    n = max(1, int(free // per_image))
    return max(1, min(AUTO_MAX_BATCH, 1 << (n.bit_length() - 1)))
