# bench.py: the shakespeare-char model at its CPU size (nanoGPT's laptop recipe), training throughput
#   python bench.py config/bench_shakespeare_char.py                    # float32
#   python bench.py config/bench_shakespeare_char.py --dtype=bfloat16   # bf16 autocast
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
vocab_size = 65  # the characters of tiny shakespeare
batch_size = 12
mode = 'train'
# a step is a few ms: many steps, so the median is not one scheduler hiccup
warmup_steps = 10
timed_steps = 100
