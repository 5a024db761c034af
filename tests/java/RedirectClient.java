import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.HttpURLConnection;
import java.net.URL;

/**
 * Java's two built-in HTTP clients, used as an application uses them (nothing here knows
 * of a proxy): java.net.http.HttpClient follows a 307 after POST, HttpURLConnection a 302.
 * `redirect-audit run` records them through JAVA_TOOL_OPTIONS. Run from source:
 * `java tests/java/RedirectClient.java ORIGIN...`.
 */
public class RedirectClient {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().followRedirects(HttpClient.Redirect.NORMAL).build();
        for (String up : args) {  // each origin given: plain HTTP, HTTPS
            HttpResponse<String> r = client.send(
                HttpRequest.newBuilder(URI.create(up + "/r/307/java")).POST(HttpRequest.BodyPublishers.ofString("a=1")).build(),
                HttpResponse.BodyHandlers.ofString());
            System.out.println("httpclient " + r.statusCode());
            HttpURLConnection conn = (HttpURLConnection) new URL(up + "/r/302/legacy").openConnection();
            System.out.println("urlconnection " + conn.getResponseCode());
        }
    }
}
