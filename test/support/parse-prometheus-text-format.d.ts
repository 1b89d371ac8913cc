// Types of the npm package parse-prometheus-text-format 1.1, which ships
// none. Values stay strings, as the package returns them.
declare module 'parse-prometheus-text-format' {
  /** One series of a family. Which fields are set depends on its type. */
  export interface PrometheusSample {
    value?: string;
    labels?: Record<string, string>;
    /** Histogram buckets by upper bound ("+Inf" included). */
    buckets?: Record<string, string>;
    quantiles?: Record<string, string>;
    count?: string;
    sum?: string;
  }

  export interface PrometheusFamily {
    name: string;
    help: string;
    type: 'COUNTER' | 'GAUGE' | 'HISTOGRAM' | 'SUMMARY' | 'UNTYPED';
    metrics: PrometheusSample[];
  }

  /** Parses the text format and throws InvalidLineError on a bad line. */
  export default function parsePrometheusTextFormat(
    text: string,
  ): PrometheusFamily[];
}
