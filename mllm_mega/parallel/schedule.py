"""Forward-only passes through megatron's pipeline schedule (verify, generation): one micro-batch, any TP/PP."""
from __future__ import annotations


def forward_only(model, batch, seq_len):
    """Forward-only through megatron's pipeline schedule; returns logits (T, V/TP) on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        b = next(data_iterator)
        # preference packs (shared media, ViT once per pair): passed only when present
        shared = {k: b[k] for k in ("image_feature_index", "video_feature_index") if b.get(k) is not None}
        out = m(b["input_ids"], b["position_ids"], b["cu_seqlens"], pixel_values=b.get("pixel_values"),
                image_grid_thw=b.get("image_grid_thw"), pixel_values_videos=b.get("pixel_values_videos"),
                video_grid_thw=b.get("video_grid_thw"), context_parallel=b.get("context_parallel"), **shared)

        def collect(output, non_loss_data=False):
            return output

        return out, collect

    fb = get_forward_backward_func()
    outs = fb(forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
              seq_length=seq_len, micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    return outs[0] if outs else None
