"""Run under torchrun (2 ranks, gloo): each rank holds half of a fixed batch of features and writes its share of
the InfoNCE loss and the gradient of its rows, for tests/models/test_videotext.py to compare with one process."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from intern2.models.videotext import clip_contrastive_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(0)
video = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
text = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
local_video, local_text = video[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
loss, _ = clip_contrastive_loss(local_video, local_text, torch.tensor(10.0))
loss.backward()
save_file({"loss": loss.detach().reshape(1), "video_grad": local_video.grad, "text_grad": local_text.grad},
          f"{sys.argv[1]}/rank{rank}.safetensors")
dist.destroy_process_group()
