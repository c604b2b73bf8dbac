"""Training run used by test_translation.py: `python dist_translation.py OUT [fsdp]`, under torchrun."""
import hashlib
import sys

import torch
from safetensors.torch import save_file

from intern2.engine import TrainConfig, Trainer
from intern2.tasks.translation import TranslationConfig, TranslationTask

out, fsdp = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "fsdp"
torch.set_num_threads(1)
cfg = TranslationConfig(model_args=dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64),
                        tgt_langs=("fra_Latn",), vocab_size=300, max_tokens=512, max_eval_examples=8,
                        train=TrainConfig(max_steps=3, batch_size=1, lr=1e-3, warmup_steps=2, schedule="inverse_sqrt",
                                          weight_decay=0.0, fsdp=fsdp, out_dir=out, device="cpu", log_every=1,
                                          checkpoint_every=3, seed=7))
task = TranslationTask(cfg)
trainer = Trainer(task, cfg.train)
metrics = trainer.fit()
rank = trainer.dist.rank
pieces = "\n".join(task.tokenizer.sp.id_to_piece(i) for i in range(task.tokenizer.sp.get_piece_size()))
with open(f"{out}/rank{rank}.txt", "w") as f:  # the tokenizer each rank trained, and the metrics it reported
    f.write(f"{hashlib.sha256(pieces.encode()).hexdigest()} {metrics['chrf']:.6f}\n")
if not fsdp:
    save_file({k: v.clone() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
