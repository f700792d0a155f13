"""A decoder written like HF transformers: layers called by keyword, returning tuples
(hidden state first), marked for pipelining from outside."""
import torch
from torch import nn
import torch.nn.functional as F
import shardlang as sl

class Layer(nn.Module):
    def __init__(self, d):
        super().__init__(); self.fc1 = nn.Linear(d, 4*d); self.fc2 = nn.Linear(4*d, d); self.norm = nn.LayerNorm(d)
    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        h = hidden_states + self.fc2(F.gelu(self.fc1(self.norm(hidden_states))))
        return (h, None)

class Model(nn.Module):
    def __init__(self, vocab=64, d=32, n=4):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n))
        self.norm = nn.LayerNorm(d); self.lm_head = nn.Linear(d, vocab, bias=False)
    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        for layer in self.layers:
            h = layer(hidden_states=h, attention_mask=None, position_ids=pos)[0]
        return self.lm_head(self.norm(h))

def factory():
    m = Model()
    return sl.annotate(m, {"layers.*.fc1.weight": ("mlp", "embed"), "layers.*.fc1.bias": ("mlp",),
                           "layers.*.fc2.weight": ("embed", "mlp"), "layers": ("layers",)})
