"""The training run's figures, drawn with matplotlib's Agg backend into PNG files."""
import numpy


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves(history, path, title=""):
    """Loss (train and test) and accuracy per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 10:  # few points: a tick on each (a lone one gets no fractions)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion(matrix, classes, path, title=""):
    """Test-set confusion matrix: rows are true classes, columns predictions."""
    plt = _pyplot()
    matrix = numpy.asarray(matrix)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images")
    ticks = numpy.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
