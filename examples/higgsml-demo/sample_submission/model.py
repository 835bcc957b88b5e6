"""Sample submission of the HiggsML uncertainty demo: a counting experiment.

The model counts the events in a visible-mass window around the 125 GeV peak and
subtracts the background expected there. Its interval combines the Poisson error
of the count, the statistical error of the training set and the shift of the
estimate when the tau energy scale (TES) moves by one standard deviation.
"""

import math

# Visible-mass window in GeV. It contains about 87 % of the signal.
MASS_LOW = 110.0
MASS_HIGH = 140.0

# Standard deviation of the TES factor alpha, as the competition description states.
TES_SIGMA = 0.01


def _window_mask(data_set):
    mass = data_set["data"]["mass_vis"]
    return (mass >= MASS_LOW) & (mass < MASS_HIGH)


class Model:
    """Counting model with the interface that the ingestion program calls.

    get_train_set() returns a dict with "data" (feature name -> array), "labels"
    (1 for signal) and "weights". systematics(data_set, tes) returns a copy of a
    data set with the energy-like features multiplied by tes.
    """

    def __init__(self, get_train_set=None, systematics=None):
        self.get_train_set = get_train_set
        self.systematics = systematics
        self.yields = {}

    def _window_yields(self, train_set):
        """Return the weighted signal and background counts inside the window."""
        in_window = _window_mask(train_set)
        is_signal = train_set["labels"] == 1
        weights = train_set["weights"]
        # math.fsum returns the correctly rounded sum, so unlike np.sum the yields do
        # not depend on the NumPy version or the CPU's SIMD code path.
        signal = math.fsum(weights[in_window & is_signal])
        background = math.fsum(weights[in_window & ~is_signal])
        return signal, background

    def fit(self):
        """Measure the expected yields in the window at alpha = 1 and 1 +- TES_SIGMA."""
        train_set = self.get_train_set()
        for tes in (1.0 - TES_SIGMA, 1.0, 1.0 + TES_SIGMA):
            self.yields[tes] = self._window_yields(self.systematics(train_set, tes))

        # Statistical variance of the weighted training counts: the sum of squared
        # weights in the window.
        in_window = _window_mask(train_set)
        is_signal = train_set["labels"] == 1
        weights = train_set["weights"]
        self.signal_variance = math.fsum(weights[in_window & is_signal] ** 2)
        self.background_variance = math.fsum(weights[in_window & ~is_signal] ** 2)

    def predict(self, test_set):
        """Return mu_hat with a symmetric 68 % interval for one pseudo-experiment."""
        count = math.fsum(test_set["weights"][_window_mask(test_set)])
        signal, background = self.yields[1.0]
        mu_hat = (count - background) / signal

        # Poisson error of the observed count. One event is the floor, so that an
        # empty window still gets a non-zero width.
        statistical = math.sqrt(max(count, 1.0)) / signal

        # Error of the expected yields, which come from a finite training set.
        training = (
            math.sqrt(self.background_variance + mu_hat**2 * self.signal_variance)
            / signal
        )

        signal_down, background_down = self.yields[1.0 - TES_SIGMA]
        signal_up, background_up = self.yields[1.0 + TES_SIGMA]
        mu_down = (count - background_down) / signal_down
        mu_up = (count - background_up) / signal_up
        tes = abs(mu_up - mu_down) / 2.0

        delta = math.sqrt(statistical**2 + training**2 + tes**2)
        return {
            "mu_hat": mu_hat,
            "delta_mu_hat": delta,
            "p16": mu_hat - delta,
            "p84": mu_hat + delta,
        }
