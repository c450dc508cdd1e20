"""What `switch-serve bench` runs: the built-in checkpoint shapes, the workloads and the concurrency sweep.
Pure data, so the command line can offer them without loading the benchmark."""

BENCH_SHAPE = "base-8"  # the shape a run measures unless told
SHAPES = {
    # switch-base-8: 12 + 12 layers, every other one sparse, 8 experts, d_model 768, d_ff 3072.
    "base-8": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
                   num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8,
                   expert_capacity=64),
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_heads=4, num_layers=4, num_decoder_layers=4,
                 num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=64),
}
# (prompt tokens, output tokens), each drawn uniformly from its range.
WORKLOADS = {"default": ((8, 64), (16, 64)), "long-prompts": ((16, 128), (8, 48)), "short": ((4, 16), (4, 16))}
BENCH_WORKLOADS = ("default", "long-prompts")  # what a run measures unless told
CONCURRENCY = (1, 4, 8, 16, 32, 64)
REQUESTS = 32  # per workload: the targets are measured with all of them in flight at once
HF_BATCH_SIZES = (1, 8, 16)  # besides each concurrency and "all"
