"""The geometry cache Conv2D and the pooling layers share: a layer parses its
arguments once, in its constructor, and computes its geometry once per input
shape, here."""


class GeometryCache:
    """The geometry of a layer's last input, computed again only when its key changes:
    what the geometry and its checks depend on (shapes, dtypes, array types)."""

    __slots__ = ("key", "value")

    def __init__(self):
        self.key = self.value = None

    def get(self, key, compute):
        """The geometry for key: the one held where the key is the last one's, else
        compute() (which checks the arrays and raises on bad ones), then held."""
        if self.value is None or key != self.key:
            self.value, self.key = compute(), key
        return self.value
