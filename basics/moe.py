"""Mixture-of-Experts: a top-k router, a loop over experts, and DeepSeek-V3's bias balancing.

Shows (DeepSeek-V3, arXiv 2412.19437, section 2.1):
- the router scores every expert with a sigmoid, s = sigmoid(x W_r^T), not a softmax over experts;
- each token goes to the k experts of highest s + b: b is a per-expert bias that only chooses, the
  gate weights are the chosen s themselves (normalised over the k), so b never scales an output;
- the experts run in a loop, each on the tokens routed to it (checked against a dense reference
  that runs every expert on every token and keeps the chosen ones);
- aux-loss-free balancing: after each step b += rate * sign(mean load - load), so overloaded
  experts become less likely to be chosen and idle ones more, with no loss term in the gradient.
Tokens here share a common direction that the router favours a few experts for, as real hidden
states do; the load is printed before balancing and after. The lab's fast version is
llmlabs/moe.py (3-D expert weights, the experts as two grouped matmuls on a GPU, the load summed
over micro-batches and ranks, shared experts).

    python basics/moe.py"""
import argparse

import torch
import torch.nn.functional as F


class MoE(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Linear(dim, n_experts, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(n_experts, hidden, dim) / dim**0.5)
        self.w_out = torch.nn.Parameter(torch.randn(n_experts, dim, hidden) / hidden**0.5)
        self.register_buffer("bias", torch.zeros(n_experts))  # moved by balance(), never by a gradient

    def route(self, x):
        """x [N, C] -> (chosen experts [N, k], gates [N, k], load [E])."""
        scores = torch.sigmoid(self.router(x))
        chosen = torch.topk(scores + self.bias, self.top_k, dim=-1).indices  # the bias only chooses
        gates = scores.gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        load = torch.bincount(chosen.flatten(), minlength=len(self.bias))
        return chosen, gates, load

    def expert(self, e, x):
        return F.linear(F.relu(F.linear(x, self.w_in[e])).square(), self.w_out[e])  # ReLU^2 MLP

    def forward(self, x):
        chosen, gates, load = self.route(x)
        out = torch.zeros_like(x)
        for e in range(len(self.bias)):  # each expert sees only its own tokens
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.expert(e, x[token]) * gates[token, slot, None])
        return out, load

    def dense_reference(self, x):
        """Every expert on every token, weighted by a [N, E] gate matrix that is zero off the chosen k."""
        chosen, gates, _ = self.route(x)
        weight = torch.zeros(len(x), len(self.bias), dtype=x.dtype).scatter(1, chosen, gates)
        return sum(weight[:, e, None] * self.expert(e, x) for e in range(len(self.bias)))

    @torch.no_grad()
    def balance(self, load, rate: float):
        """Aux-loss-free balancing: push the bias toward the under-loaded experts."""
        self.bias += rate * torch.sign(load.float().mean() - load.float())


def imbalance(load):
    """max load / mean load: 1 is perfectly even; the busiest expert sets a step's time."""
    return (load.max() / load.float().mean()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rate", type=float, default=1e-3, help="bias update per step (DeepSeek-V3: 0.001)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dim, E, k, N = 64, 8, 2, 2048
    moe = MoE(dim, 4 * dim, E, k)
    common = 2.0 * torch.randn(dim) / dim**0.5  # a direction every token shares: routing is skewed

    def tokens(gen):
        return torch.randn(N, dim, generator=gen) / dim**0.5 + common

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = tokens(gen)
        out, load0 = moe(x)
        diff = (out - moe.dense_reference(x)).abs().max().item()
        print(f"{E} experts, top-{k}, {N} tokens a step: loop over experts vs dense reference, max |diff| {diff:.1e}")
        assert diff < 1e-5, diff

        print(f"load before balancing  {load0.tolist()}  max/mean {imbalance(load0):.2f}")
        for step in range(args.steps):
            _, _, load = moe.route(tokens(gen))
            moe.balance(load, args.rate)
            if step in (9, 29, 99):
                print(f"  after {step + 1:3d} steps        {load.tolist()}  max/mean {imbalance(load):.2f}")
        x_eval = tokens(gen)  # fresh tokens, not the ones the bias was fit on
        _, _, load1 = moe.route(x_eval)
        print(f"load after {args.steps} steps    {load1.tolist()}  max/mean {imbalance(load1):.2f}")
        print(f"bias: {[round(b, 3) for b in moe.bias.tolist()]}")

        # the bias changed which experts are chosen, never how much a chosen one counts
        chosen, gates, _ = moe.route(x_eval)
        scores = torch.sigmoid(moe.router(x_eval)).gather(-1, chosen)
        assert torch.allclose(gates, scores / scores.sum(-1, keepdim=True))
    assert imbalance(load0) > 2.0, "the demo needs a skewed start"
    assert imbalance(load1) < 1.2, f"balancing left max/mean {imbalance(load1):.2f}"
    print(f"OK: max/mean load {imbalance(load0):.2f} -> {imbalance(load1):.2f} with no auxiliary loss; the gates never saw the bias")


if __name__ == "__main__":
    main()
