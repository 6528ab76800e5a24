"""Module trees with the public code's names, written independently of energy_train.models,
used to produce state_dicts "as the public code writes them" (tests only)."""
import math

import torch
from torch import nn


class OFTBlock(nn.Module):
    def __init__(self, dim, act):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), act())

    def forward(self, x):
        return x + self.ffn(x)


class OFTMLPResNet(nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim, act=nn.ReLU):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = act()
        self.mlp_resnet_blocks = nn.ModuleList([OFTBlock(hidden_dim, act) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for b in self.mlp_resnet_blocks:
            x = b(x)
        return self.fc2(self.layer_norm2(x))


class OFTActionHead(nn.Module):
    def __init__(self, input_dim, hidden_dim, action_dim, chunk):
        super().__init__()
        self.chunk = chunk
        self.model = OFTMLPResNet(2, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, h):
        return self.model(h.reshape(h.shape[0], self.chunk, -1))


class ForkPE(nn.Module):
    """The fork's table is a plain attribute: not in the state_dict."""

    def __init__(self, hidden, max_len=64):
        super().__init__()
        self.P = torch.zeros((1, max_len, hidden), dtype=torch.float64)
        X = torch.arange(max_len, dtype=torch.float64).reshape(-1, 1) / torch.pow(
            10000, torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
        self.P[:, :, 0::2] = torch.sin(X)
        self.P[:, :, 1::2] = torch.cos(X)

    def forward(self, x):
        return x + self.P[:, : x.shape[1], :].to(x.dtype)


class ForkEnergy(nn.Module):
    """The fork's final parameter tree (no gate_a) and maths (head per step, the output
    transform per step, mean over H), attention through nn.MultiheadAttention itself.
    ``output``: "unbounded" or the fork's "sigmoid" (sigmoid(0.5 x) * 2 + 0.1).
    tests/test_fork_energy.py has every published version."""

    def __init__(self, state_dim, act_dim, hidden, heads, output="unbounded"):
        super().__init__()
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.pe_layer = ForkPE(hidden)
        self.state_linear = OFTMLPResNet(1, state_dim, hidden, hidden, nn.SiLU)
        self.action_linear = OFTMLPResNet(1, act_dim, hidden, hidden, nn.SiLU)
        self.prediction_head = OFTMLPResNet(2, hidden, hidden, 1, nn.SiLU)
        self.output = output

    def forward(self, ctx, a, pad_mask=None):
        c = self.state_linear(ctx)
        q = self.pe_layer(self.action_linear(a))
        z, _ = self.cross(q, c, c, key_padding_mask=pad_mask, need_weights=False)
        e = self.prediction_head(z)
        if self.output == "sigmoid":
            e = torch.sigmoid(e * 0.5) * 2.0 + 0.1
        return e.mean(dim=1)
