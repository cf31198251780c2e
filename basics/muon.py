"""Muon's orthogonalisation: Newton-Schulz and Polar Express against the SVD, and a Muon step.

Shows: Muon (Keller Jordan, kellerjordan.github.io/posts/muon) replaces a weight matrix's update G
by its polar factor U V^T (G = U S V^T): every singular value set to 1, so the step moves all
directions of the matrix equally, however lopsided the gradient. An SVD is slow on a GPU, so U V^T
is approximated by a few matrix products: X <- a X + b (X X^T) X + c (X X^T)^2 X applies the odd
polynomial p(s) = a s + b s^3 + c s^5 to every singular value at once and leaves U, V alone.
- Newton-Schulz (modded-nanogpt): one fixed polynomial, (3.4445, -4.7750, 2.0315), 5 times; it
  drives singular values into a band around 1 (about 0.7 to 1.2), not to 1.
- Polar Express (Amsel, Persson, Musco, Gower; arXiv 2505.16932): a different polynomial at each
  iteration, each the best worst-case one for what the previous ones left; closer to U V^T in the
  same 5 iterations.
The lab's fast version is llmlabs/optim.py (polar_express, and MuonAdamW: stacked same-shape
matrices, bf16 on GPUs, NorMuon's per-neuron scaling and cautious weight decay on top).

    python basics/muon.py"""
import argparse

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic: steep at 0, not converging to 1
# Polar Express, arXiv 2505.16932 (Algorithm 1; as llmlabs/optim.py): the first seven divided by a 1.01
# safety factor as published, so rounding cannot push a singular value past the stable range
_PE = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
       (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
       (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
       (3.3184196573706015, -2.488488024314874, 0.51004894012372),
       (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
       (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
       (1.8750014808534479, -1.2500016453999487, 0.3750001645474248)]
POLAR_EXPRESS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE] + [(1.875, -1.25, 0.375)]


# --- the ~40 lines: orthogonalise, and one Muon step ---------------------------------------------
def orthogonalise(G, coeffs, steps: int = 5):
    """Approximate U V^T of G = U S V^T with `steps` odd quintic polynomials (one (a, b, c) per step;
    past the list, the last one again)."""
    X = G.mT if G.size(0) > G.size(1) else G  # work on the short side: X X^T is min(m, n)^2
    X = X / (X.norm() * 1.01 + 1e-7)  # Frobenius norm >= largest singular value: all of them now <= 1
    for t in range(steps):
        a, b, c = coeffs[min(t, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X  # p(X) = aX + bX^3 + cX^5 on the singular values
    return X.mT if G.size(0) > G.size(1) else X


def muon_step(W, grad, buf, lr: float, momentum: float = 0.95, coeffs=POLAR_EXPRESS):
    """One Muon update of the matrix W in place (buf: its momentum buffer, same shape)."""
    buf.mul_(momentum).add_(grad)                  # momentum
    g = grad.add(buf, alpha=momentum)              # Nesterov: look ahead along the buffer
    update = orthogonalise(g, coeffs)
    # every singular value ~1: scale so a tall matrix's per-element step is not smaller (modded-nanogpt)
    W.sub_(lr * max(1.0, W.size(0) / W.size(1)) ** 0.5 * update)
# --------------------------------------------------------------------------------------------------


def spread(name, S):
    print(f"  {name:<22} singular values min {S.min():.4f}  median {S.median():.4f}  max {S.max():.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=256)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    m, n = args.rows, args.cols
    # a gradient-like matrix: singular values spread over two decades (1 .. 0.01), random U and V
    U0, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    G = (U0 * torch.logspace(0, -2, n, dtype=torch.float64)) @ V0.T
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact answer
    print(f"G: {m} x {n}, float32, condition number {S.max() / S.min():.0f}")
    spread("G", S)
    spread("U V^T (SVD)", torch.linalg.svdvals(polar))

    def error(X):
        return ((X.double() - polar).norm() / polar.norm()).item()

    for name, coeffs in [("Newton-Schulz", [NEWTON_SCHULZ]), ("Polar Express", POLAR_EXPRESS)]:
        spread(f"{name}, 5 steps", torch.linalg.svdvals(orthogonalise(G.float(), coeffs, 5).double()))
    print("  ||X - U V^T|| / ||U V^T|| after each number of steps:")
    print(f"    {'steps':<14}" + "".join(f"{t:>8}" for t in range(1, 9)))
    errors = {}
    for name, coeffs in [("Newton-Schulz", [NEWTON_SCHULZ]), ("Polar Express", POLAR_EXPRESS)]:
        errors[name] = [error(orthogonalise(G.float(), coeffs, t)) for t in range(1, 9)]
        print(f"    {name:<14}" + "".join(f"{e:8.4f}" for e in errors[name]))
    bf16 = error(orthogonalise(G.bfloat16(), POLAR_EXPRESS, 5))
    print(f"  Polar Express in bf16 (as on a GPU), 5 steps: {bf16:.4f}")
    ns, pe = errors["Newton-Schulz"], errors["Polar Express"]
    assert pe[4] < ns[4], "Polar Express should be nearer U V^T than Newton-Schulz after 5 steps"
    assert pe[7] < 1e-3 and min(ns) > 0.1, "Polar Express converges to U V^T; Newton-Schulz stays in a band"
    assert bf16 < 2 * pe[4], "bf16 should not lose much"

    # Muon on a least-squares problem with badly conditioned inputs: min ||W X - Y||^2 / N
    X = torch.randn(n, 1024) * torch.logspace(0, -2, n)[:, None]
    Y = torch.randn(m, n) / n**0.5 @ X
    W, buf = torch.zeros(m, n), torch.zeros(m, n)
    losses = []
    for step in range(200):
        residual = W @ X - Y
        losses.append(residual.square().mean().item())
        grad = 2 * residual @ X.T / residual.numel()  # d loss / d W
        muon_step(W, grad, buf, lr=0.02 * (1 - step / 200))  # linear decay to zero
    print(f"Muon on min ||W X - Y||^2, 200 steps: loss {losses[0]:.4f} -> {losses[-1]:.6f}")
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    print("OK: Polar Express reaches U V^T (error < 1e-3 by 8 steps), Newton-Schulz stays in its band; Muon minimises")


if __name__ == "__main__":
    main()
