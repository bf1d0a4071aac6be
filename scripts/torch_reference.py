#!/usr/bin/env python3
"""PyTorch reference figures on the same machine as a Kiln benchmark: f32 matmul GFLOP/s (TF32 off) and the
LeNet-5 / MLP / ResNet-20 training steps (forward + backward + Adam, batch 64), median of 20 steps after warm-up."""
import statistics, sys, time

import torch
import torch.nn as nn

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
print("torch", torch.__version__, "device", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu")

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

def median_ms(fn, warm=3, runs=20):
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); sync(); times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)

for n in [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,2048,4096").split(",")]:
    a = torch.randn(n, n, device=dev); b = torch.randn(n, n, device=dev)
    ms = median_ms(lambda: a @ b)
    print(f"torch matmul {n}: {ms:.3f} ms, {2 * n**3 / ms / 1e6:.1f} GFLOP/s")

def step_time(model, x, y):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = nn.CrossEntropyLoss()
    def step():
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    return median_ms(step)

lenet = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)).to(dev)
x = torch.randn(64, 1, 28, 28, device=dev); y = torch.randint(0, 10, (64,), device=dev)
print(f"torch lenet5 step batch 64: {step_time(lenet, x, y):.3f} ms")
mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).to(dev)
print(f"torch mlp 784-128-10 step batch 64: {step_time(mlp, torch.randn(64, 784, device=dev), y):.3f} ms")

class Block(nn.Module):
    """CIFAR ResNet basic block with the 1x1 projection shortcut (option B), as Kiln's zoo builds it."""
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()
    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))

layers = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
cin = 16
for cout, stride in [(16, 1), (32, 2), (64, 2)]:
    for i in range(3):
        layers.append(Block(cin, cout, stride if i == 0 else 1)); cin = cout
resnet20 = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(dev)
x = torch.randn(64, 1, 28, 28, device=dev)
print(f"torch resnet20 step batch 64 (1x28x28): {step_time(resnet20, x, y):.3f} ms")
