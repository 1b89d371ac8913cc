import { LAYERS, type WeightMap } from './architecture.ts';
import { createRandom } from './random.ts';

/**
 * Creates fresh weights for training from scratch: He-uniform kernels
 * (limit sqrt(6 / fan_in), suited to the ReLU that follows) for the hidden
 * layers, Glorot-uniform (limit sqrt(6 / (fan_in + fan_out))) for the
 * logits layer, and zero biases. Fan-in of a convolution is kh * kw * in.
 * Equal seeds give equal weights.
 *
 * @throws {RangeError} when `seed` is not a safe integer.
 */
export function initializeWeights(seed: number): WeightMap {
  const random = createRandom(seed);
  const weights: WeightMap = new Map();
  for (const layer of LAYERS) {
    const isConv = layer.kind === 'conv';
    const fanIn = isConv
      ? layer.kernelSize * layer.kernelSize * layer.inChannels
      : layer.inUnits;
    const fanOut = isConv ? layer.outChannels : layer.outUnits;
    const isLogits = layer.kind === 'dense' && !layer.relu;
    const limit = Math.sqrt(6 / (isLogits ? fanIn + fanOut : fanIn));

    const kernel = new Float32Array(fanIn * fanOut);
    for (let i = 0; i < kernel.length; i++) {
      kernel[i] = (2 * random() - 1) * limit;
    }
    weights.set(`${layer.name}/kernel`, kernel);
    weights.set(`${layer.name}/bias`, new Float32Array(fanOut));
  }
  return weights;
}
