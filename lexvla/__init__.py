"""Unified lexical representations for interpretable visual-language alignment (LexVLA), notebook-first and reproducible

Modules:

- `lexvla.caches`: Reading the two exact caches, the frozen LM prefix of each caption and the frozen ViT's tokens of each image, and the checks that refuse a cache built for another model.
- `lexvla.datasets`: One on-disk format for every dataset (webdataset shards, Karpathy JSON, COCO-style masks), readers for real data, and loaders that survive bad input and count it.
- `lexvla.encode`: A trained model's vectors of images, patches, captions and class names, in batches, from the exact caches when they hold the inputs and from the live towers when they do not.
- `lexvla.evaluate`: The `evaluate` stage: zero-shot retrieval at the dense lexical vectors and along the sparsity sweep, PatchDis mIoU, chance levels, and the vectors the reports draw.
- `lexvla.index`: An exact, explainable in-process inverted index over sparse lexical vectors: numpy posting lists, top-k identical to brute force, every hit explained word by word; saved without pickles.
- `lexvla.losses`: LexVLA's training objective: symmetric InfoNCE plus a warmed-up sparsity penalty (overuse or FLOPs) on both modalities.
- `lexvla.maxpool`: Memory-lean patch -> vocabulary max-pool: `max_n (H Zᵀ)` without materialising batch x patches x V (method §4).
- `lexvla.metrics`: Zero-shot retrieval Recall@K and ranks (CLIP_benchmark protocol, open_clip names), the sparsity-recall sweep, and PatchDis mIoU.
- `lexvla.milvus`: Lexical vectors in Milvus (sparse float vectors, inner product, sparse inverted index), embedded by default with milvus-lite; word-level explanations from the stored vectors; portable JSONL and integer-impact exports.
- `lexvla.model`: LexVLA: a frozen ViT and a LoRA-tuned causal LM aligned in one lexical space, from a CPU-sized default to paper scale.
- `lexvla.prepare`: The `prepare` stage: build the embedded dataset, or bring real data (img2dataset shards, Karpathy splits, a manifest) into the one on-disk format.
- `lexvla.report`: The `report` stage: every evaluated variant side by side, the inputs the analysis notebooks share, and executed notebooks that hash the same on every run.
- `lexvla.runtime`: What every stage shares and no stage owns: the repository's paths, atomic writes, seeds, the device, the record of the environment, and one command-line pattern.
- `lexvla.scenes`: A procedural, seeded, bit-reproducible scene generator: images of coloured shapes, five captions each, and per-pixel semantic and instance masks.
- `lexvla.search`: The DVC `search` stage: a variant's test-image vectors in Milvus, every top-k checked against brute force, portable exports; and the command line of the in-process inverted index (`index build`, `index query`).
- `lexvla.sparse`: Sparse lexical vectors (CSR over the vocabulary, with item ids), word-level explanations of a score, and sparsity statistics.
- `lexvla.train`: The `train` stage: fine-tune one LexVLA variant from `params.yaml`, on a CPU, one GPU or many; resumable, observable, bit-reproducible."""

__version__ = "0.0.1"
