"""Linear-cost streaming decoder for XTTS.

coqui's `Xtts.inference_stream` re-runs HiFi-GAN over *all* latents generated so far at every chunk,
so a long sentence costs O(n^2). Here each chunk is vocoded from its new frames plus a bounded left
context, which makes the total cost linear.

Why the seams match the one-shot decode: XTTS's decoder first interpolates the GPT latents onto a
finer grid (x4, then 24/22.05 kHz) and HiFi-GAN then upsamples that grid by a fixed hop. The grid is
built once for all latents so far (cheap: linear interpolation), so every window is a slice of the same
grid as the one-shot decode; HiFi-GAN is a convolution, hence windows differ from the one-shot audio
only near their edges. The left context covers the left edge, the last `lookahead` latent frames are
held back until more arrive (the vocoder is not causal), and a short cross-fade hides what is left.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class ChunkDecoder:
    def __init__(
        self,
        to_grid: Callable[[torch.Tensor], torch.Tensor],
        vocode: Callable[[torch.Tensor], np.ndarray],
        columns_per_frame: float,
        hop: int,
        context_frames: int = 12,
        lookahead_frames: int = 3,
        crossfade_samples: int = 256,
    ):
        self._to_grid = to_grid  # latents [1, T, C] -> grid [1, C', N]
        self._vocode = vocode  # grid slice [1, C', n] -> float32 audio of n * hop samples
        self._cpf = columns_per_frame
        self._hop = hop
        self._context_cols = int(np.ceil(context_frames * columns_per_frame))
        self._lookahead = lookahead_frames
        self._crossfade = crossfade_samples
        self._latents: list[torch.Tensor] = []
        self._emitted_cols = 0  # audio up to this grid column has been yielded
        self._tail: np.ndarray | None = None  # audio just past that column, from the previous window

    @property
    def frames(self) -> int:
        return len(self._latents)

    def add(self, latent: torch.Tensor) -> None:
        self._latents.append(latent.reshape(1, -1))

    def flush(self, final: bool = False) -> np.ndarray:
        """Vocode what can be emitted now; with `final`, everything left."""
        frames = len(self._latents)
        if frames == 0:
            return np.zeros(0, dtype=np.float32)
        grid = self._to_grid(torch.cat(self._latents, dim=0)[None])
        total_cols = grid.shape[-1]
        # Columns far enough from the right edge not to change when more latents arrive.
        stable = total_cols if final else min(total_cols, int((frames - self._lookahead) * self._cpf))
        if stable <= self._emitted_cols:
            return np.zeros(0, dtype=np.float32)
        start = max(0, self._emitted_cols - self._context_cols)
        end = total_cols if final else min(total_cols, stable + self._context_cols // 2)
        wav = self._vocode(grid[..., start:end])
        s0 = (self._emitted_cols - start) * self._hop
        s1 = (stable - start) * self._hop
        chunk = wav[s0:s1].copy()
        if self._tail is not None and len(self._tail) and len(chunk):
            n = min(len(self._tail), len(chunk))
            fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
            chunk[:n] = self._tail[:n] * (1.0 - fade) + chunk[:n] * fade
        self._tail = None if final else wav[s1 : s1 + self._crossfade].copy()
        self._emitted_cols = stable
        return chunk
