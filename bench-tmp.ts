import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import { conv2dIm2col, maxPool2x2 } from '/work/main/models/forward.ts';
await tf.setBackend('wasm');
type Conv = (x: tf.Tensor4D, k: tf.Tensor4D) => tf.Tensor4D;
const conv3dDepth1: Conv = (x, k) => {
  const [b, h, w, c] = x.shape; const [kh, kw, , o] = k.shape;
  return tf.conv3d(x.reshape([b, 1, h, w, c]) as tf.Tensor5D, k.reshape([1, kh, kw, c, o]) as tf.Tensor5D, 1, 'same').reshape([b, h, w, o]);
};
function backpropFilter(x: tf.Tensor4D, dy: tf.Tensor4D, shape: number[]): tf.Tensor4D {
  const [b, h, w, c] = x.shape; const o = dy.shape[3];
  const dw = tf.engine().runKernel('Conv3DBackpropFilterV2', { x: x.reshape([b, 1, h, w, c]), dy: dy.reshape([b, 1, h, w, o]) }, { strides: [1, 1, 1, 1, 1], pad: 'same', filterShape: [1, shape[0], shape[1], c, o] }) as tf.Tensor;
  return dw.reshape(shape) as tf.Tensor4D;
}
const convNativeCustom: Conv = (x, k) => tf.customGrad((xx: tf.Tensor, kk: tf.Tensor, save: tf.GradSaveFunc) => {
  save([xx, kk]);
  return { value: tf.conv2d(xx as tf.Tensor4D, kk as tf.Tensor4D, 1, 'same'), gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
    const [sx, sk] = saved as [tf.Tensor4D, tf.Tensor4D];
    return [tf.conv2dTranspose(dy as tf.Tensor4D, sk, sx.shape as [number, number, number, number], 1, 'same'), backpropFilter(sx, dy as tf.Tensor4D, sk.shape)];
  } };
})(x, k) as tf.Tensor4D;
const convNativeIm2colGrad: Conv = (x, k) => tf.customGrad((xx: tf.Tensor, kk: tf.Tensor, save: tf.GradSaveFunc) => {
  save([xx, kk]);
  return { value: tf.conv2d(xx as tf.Tensor4D, kk as tf.Tensor4D, 1, 'same'), gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
    const [sx, sk] = saved as [tf.Tensor4D, tf.Tensor4D];
    const [b, h, w, c] = sx.shape; const [kh, kw, , o] = sk.shape;
    const padded = tf.pad(sx, [[0, 0], [1, 1], [1, 1], [0, 0]]);
    const patches = [];
    for (let i = 0; i < kh; i++) for (let j = 0; j < kw; j++) patches.push(tf.slice(padded, [0, i, j, 0], [b, h, w, c]));
    const cols = tf.concat(patches, 3).reshape([b * h * w, kh * kw * c]);
    const dk = tf.matMul(cols, dy.reshape([b * h * w, o]), true, false).reshape(sk.shape);
    return [tf.conv2dTranspose(dy as tf.Tensor4D, sk, sx.shape as [number, number, number, number], 1, 'same'), dk];
  } };
})(x, k) as tf.Tensor4D;

const specs = [[3, 16], [16, 32], [32, 64]];
function run(name: string, conv: Conv, pool: 'native' | 'reshape', batch = 64, steps = 6) {
  const vars = specs.map(([i, o]) => tf.variable(tf.randomNormal([3, 3, i, o], 0, 0.1)));
  const d1 = tf.variable(tf.randomNormal([1024, 128], 0, 0.03)); const d2 = tf.variable(tf.randomNormal([128, 43], 0, 0.1));
  const x = tf.randomUniform([batch, 32, 32, 3]) as tf.Tensor4D; const y = tf.oneHot(tf.randomUniform([batch], 0, 43, 'int32') as tf.Tensor1D, 43);
  const opt = tf.train.sgd(0.01);
  const step = () => opt.minimize(() => {
    let h: tf.Tensor4D = x;
    for (const v of vars) { const a = tf.relu(conv(h, v as unknown as tf.Tensor4D)) as tf.Tensor4D; h = pool === 'native' ? tf.maxPool(a, 2, 2, 'valid') : maxPool2x2(a); }
    const logits = tf.matMul(tf.relu(tf.matMul(h.reshape([batch, -1]), d1)), d2);
    return tf.losses.softmaxCrossEntropy(y, logits) as tf.Scalar;
  }, false);
  step(); step();
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) step();
  tf.dispose(vars); // loss disposal
  const dt = (performance.now() - t0) / 1000;
  console.log(name, pool, (steps * batch / dt).toFixed(1), 'img/s', tf.memory().numTensors);
}
const which = process.argv[2] ?? 'all';
if (which === 'all' || which === 'a') run('im2col-autodiff', conv2dIm2col, 'reshape');
if (which === 'all' || which === 'a') run('im2col-autodiff', conv2dIm2col, 'native');
if (which === 'all' || which === 'b') run('conv3d-depth1', conv3dDepth1, 'native');
if (which === 'all' || which === 'c') run('native+bpf3d', convNativeCustom, 'native');
if (which === 'all' || which === 'd') run('native+im2colgrad', convNativeIm2colGrad, 'native');
