"""Generation: sampling filters, generate at any schedule / size / aspect, image-to-image editing."""
